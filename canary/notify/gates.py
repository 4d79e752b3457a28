"""Gate webhooks: Flagger's webhook kinds, asked for by the rollout machine (CallGate).

Why: teams already run Flagger-style receivers (the load tester, manual approval services,
smoke tests) that answer a rollout webhook with 2xx (go) or anything else (wait, or fail).
The machine decides what an answer means (canary.core.rollout); this module only asks: it
POSTs Flagger's payload ``{"name", "namespace", "phase", "checksum", "type", "metadata"}``
(metadata passed through verbatim, so a load tester's ``{"url", "rps", "duration"}`` reaches
it as written) and answers ``(ok, detail)``.

A `rollout` hook whose metadata names a rate (``rps``, and ``at: entry|canary``) is a load
test (`canary loadtest`, or any receiver that sends that load): `generated_load` reads it so
the planner's advice counts the load without a second setting, and the hook's answer names
the load ("load test: 50 req/s to app-canary.shop for 30s; HTTP 200"), so the record and
the report's timeline show it as such.

Gate URLs come from config files and annotations, so the same rules as notification
webhooks apply (canary.notify.webhooks): no redirects, and loopback, link-local,
unspecified and API-server addresses are refused unless the operator's allow-list names the
host (the connector's own resolver checks every address it connects to). Each call has a
per-attempt timeout and `retries` more attempts on no answer, 429 or 5xx; a 4xx or 3xx is a
definite "no". Calls never raise: an error is a "no" with its reason, secrets redacted.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Collection, Mapping, Sequence
from typing import Any, get_args
from urllib.parse import urlsplit

import aiohttp
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from canary.core.advice import LoadAt
from canary.core.redact import redact_text, redact_url
from canary.core.rollout import DEFAULT_GATE_FAILURE_THRESHOLD, GATE_KINDS, GateKind
from canary.notify.webhooks import (
    MAX_METADATA_BYTES,
    MAX_METADATA_KEYS,
    GuardedResolver,
    RefusedAddress,
    WebhookConfig,
    _literal_refusal,
    parse_metadata,
)
from canary.retry import RetryPolicy, retrying

__all__ = [
    "GATE_KINDS",
    "MAX_METADATA_BYTES",
    "MAX_METADATA_KEYS",
    "GateCaller",
    "GateConfig",
    "WithWebhooks",
    "chat_service",
    "gate_payload",
    "generated_load",
    "load_description",
    "load_from_gates",
    "parse_metadata",
    "parse_webhooks",
]

_MAX_ANSWER_WAIT_S = 5.0  # backoff cap between attempts


# Chat services' incoming-webhook hosts: a gate pointing at one is a notification left on a
# gate kind (`webhook.rollback` was a notification before gates), and some answer 200 to any
# JSON, which would open the gate (for `rollback`: roll every rollout back).
_CHAT_HOSTS = (
    "hooks.slack.com",
    ".webhook.office.com",
    "discord.com",
    "discordapp.com",
    "chat.googleapis.com",
)


def chat_service(url: str) -> str | None:
    """The chat service host `url` posts to, if it is one (see _CHAT_HOSTS)."""
    host = (urlsplit(url).hostname or "").lower().rstrip(".")
    for chat in _CHAT_HOSTS:
        if host == chat.lstrip(".") or (chat.startswith(".") and host.endswith(chat)):
            return host
    return None


_MAX_LOAD_RPS = 1e5  # the static config's generated_rps bound


def generated_load(kind: str, metadata: Mapping[str, str]) -> tuple[float, LoadAt] | None:
    """The load a `rollout` hook's metadata asks its receiver to send: (rps, where), or None
    when it names no rate (a hook that is not a load test). Raises ValueError naming the key.
    """
    if kind != "rollout" or "rps" not in metadata:
        return None
    text = metadata["rps"]
    try:
        rps = float(text)
    except ValueError:
        raise ValueError(f"rps: {text[:40]!r} is not a number") from None
    if not (math.isfinite(rps) and 0 < rps <= _MAX_LOAD_RPS):
        raise ValueError(f"rps: must be within (0, {_MAX_LOAD_RPS:g}], got {text[:40]}")
    at = metadata.get("at", "entry")
    if at not in ("entry", "canary"):
        raise ValueError(f"at: must be entry (through the router) or canary, got {at[:40]!r}")
    return rps, "canary" if at == "canary" else "entry"


def load_description(kind: str, metadata: Mapping[str, str]) -> str | None:
    """ "load test: 50 req/s to app-canary.shop for 30s" for a load-test rollout hook (no
    credentials or query: only the target's host), else None."""
    try:
        load = generated_load(kind, metadata)
    except ValueError:
        return None
    if load is None:
        return None
    target = metadata.get("url", "")
    host = urlsplit(target).netloc.rpartition("@")[2] if target else ""
    text = f"load test: {load[0]:g} req/s"
    text += f" to {host}" if host else ""
    text += " (canary only)" if load[1] == "canary" else ""
    duration = metadata.get("duration", "")
    return text + (f" for {duration[:20]}" if duration else "")


def load_from_gates(gates: Sequence[GateConfig]) -> tuple[float, LoadAt] | None:
    """The generated load the rollout hooks send in all: rates summed; on the canary only
    when every one says so (mixed places are counted at the entry point)."""
    loads = [load for g in gates if (load := generated_load(g.type, g.metadata)) is not None]
    if not loads:
        return None
    at: LoadAt = "canary" if all(where == "canary" for _, where in loads) else "entry"
    return sum(rps for rps, _ in loads), at


class GateConfig(BaseModel):
    """One gate webhook (static config `webhooks:` entries with a gate `type:`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    type: GateKind
    url: str
    timeout_s: float = Field(default=10.0, gt=0, le=120, allow_inf_nan=False)
    retries: int = Field(default=0, ge=0, le=10)  # more attempts after the first (Flagger's)
    metadata: dict[str, str] = Field(default_factory=dict)

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(
                "url must be an absolute http:// or https:// URL, "
                f"got {redact_url(value, keep_path=False)!r}"
            )
        chat = chat_service(value)
        if chat is not None:
            raise ValueError(
                f"url is a chat service's webhook ({chat}): a gate needs a receiver that "
                "answers Flagger's payload; notifications take no `type`"
            )
        return value

    @field_validator("type", mode="before")
    @classmethod
    def _known_type(cls, value: Any) -> Any:
        if isinstance(value, str) and value not in GATE_KINDS:
            raise ValueError(f"must be one of {', '.join(GATE_KINDS)}, got {value[:40]!r}")
        return value

    @field_validator("metadata", mode="before")
    @classmethod
    def _bounded(cls, value: Any, info: ValidationInfo) -> dict[str, str]:
        metadata = parse_metadata(value)
        generated_load(str(info.data.get("type", "")), metadata)  # a load test's rate and place
        return metadata


def parse_webhooks(value: object) -> object:
    """A config's `webhooks:` list (a `mode="before"` validator's job): an entry with a
    `type` is a gate, one without a notification; an error names the entry
    (webhooks[1].url: ...). Anything but a list is left to the field's own check."""
    if not isinstance(value, list):
        return value
    hooks: list[WebhookConfig | GateConfig] = []
    for index, item in enumerate(value):
        model: type[WebhookConfig] | type[GateConfig] = (
            GateConfig if isinstance(item, dict) and "type" in item else WebhookConfig
        )
        try:
            hooks.append(model.model_validate(item))
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            message = str(first["msg"]).removeprefix("Value error, ")
            if first["type"] == "extra_forbidden":
                message = "unknown key (typo?)"
            raise ValueError(f"webhooks[{index}].{where}: {message}") from None
    return hooks


class WithWebhooks(BaseModel):
    """A config's `webhooks:`, as a static target and a two-cluster service have them:
    chat/incident notifications of promotions, rollbacks, failovers and manual actions, and
    (entries with a `type:`) gate webhooks the rollout waits for; and the failed gate calls
    that roll back."""

    webhooks: list[WebhookConfig | GateConfig] = Field(default_factory=list)
    gate_failure_threshold: int = Field(default=DEFAULT_GATE_FAILURE_THRESHOLD, ge=1, le=100)

    @field_validator("webhooks", mode="before")
    @classmethod
    def _webhooks(cls, value: object) -> object:
        return parse_webhooks(value)

    @property
    def notifications(self) -> list[WebhookConfig]:
        return [h for h in self.webhooks if isinstance(h, WebhookConfig)]

    @property
    def gates(self) -> list[GateConfig]:
        return [h for h in self.webhooks if isinstance(h, GateConfig)]

    def gate_kinds(self) -> tuple[GateKind, ...]:
        """The kinds configured, once each (RolloutSpec.gates)."""
        return tuple(dict.fromkeys(g.type for g in self.gates))


def gate_payload(
    gate: GateConfig, *, name: str, namespace: str, phase: str, checksum: str
) -> dict[str, Any]:
    """Flagger's webhook payload (pkg/controller/webhook.go's CanaryWebhookPayload)."""
    return {
        "name": name,
        "namespace": namespace,
        "phase": phase,
        "checksum": checksum,
        "type": gate.type,
        "metadata": dict(gate.metadata),
    }


class _Again(Exception):
    """An attempt worth another: no answer, 429 or 5xx."""


class GateCaller:
    """Calls the configured gates. `ask(kind, ...)` posts to every gate of that kind at once
    and answers (True, detail) when all said 2xx. Owns its HTTP session: `aclose()` it."""

    def __init__(self, gates: Sequence[GateConfig], *, allow_hosts: Collection[str] = ()) -> None:
        self.gates = tuple(gates)
        self._allow = frozenset(h.lower().strip("[]") for h in allow_hosts)
        self._session: aiohttp.ClientSession | None = None

    @property
    def kinds(self) -> tuple[GateKind, ...]:
        """The kinds configured, in Flagger's order (the rollout spec's `gates`)."""
        wanted = {g.type for g in self.gates}
        return tuple(k for k in get_args(GateKind) if k in wanted)

    async def ask(
        self, kind: str, *, name: str, namespace: str, phase: str, checksum: str
    ) -> tuple[bool, str]:
        hooks = [g for g in self.gates if g.type == kind]
        if not hooks:
            return True, "no gate configured"
        answers = await asyncio.gather(
            *(
                self._call(
                    g,
                    gate_payload(g, name=name, namespace=namespace, phase=phase, checksum=checksum),
                )
                for g in hooks
            )
        )
        failed = [(host, detail) for ok, host, detail in answers if not ok]
        if failed:
            host, detail = failed[0]
            return False, f"{detail} from {host}"
        answer = f"HTTP {answers[0][2]}" if len(answers) == 1 else "all answered 2xx"
        loads = [d for g in hooks if (d := load_description(g.type, g.metadata)) is not None]
        return True, "; ".join((*loads, answer))

    async def _call(self, gate: GateConfig, payload: dict[str, Any]) -> tuple[bool, str, str]:
        host = redact_url(gate.url, keep_path=False)
        why = _literal_refusal(urlsplit(gate.url).hostname or "", self._allow)
        if why is not None:
            return False, host, f"refused: {why} (see --allow-webhook-host)"

        async def attempt() -> tuple[bool, str]:
            try:
                async with self._get_session().post(
                    gate.url,
                    json=payload,
                    timeout=aiohttp.ClientTimeout(total=gate.timeout_s),
                    allow_redirects=False,  # a 307 would re-POST elsewhere
                ) as response:
                    status = response.status
            except TimeoutError:
                raise _Again(f"no answer within {gate.timeout_s:g}s") from None
            except aiohttp.ClientConnectorError as exc:
                if isinstance(exc.os_error, RefusedAddress):
                    return False, f"refused: {exc.os_error}"
                raise _Again(type(exc).__name__) from None
            except aiohttp.ClientError as exc:
                raise _Again(type(exc).__name__) from None
            if 200 <= status < 300:
                return True, str(status)
            if status == 429 or status >= 500:
                raise _Again(f"HTTP {status}")
            suffix = ": a redirect, not followed" if 300 <= status < 400 else ""
            return False, f"HTTP {status}{suffix}"

        try:
            ok, detail = await retrying(
                attempt,
                policy=RetryPolicy(
                    attempts=gate.retries + 1, wait_initial_s=0.2, wait_max_s=_MAX_ANSWER_WAIT_S
                ),
                on=_Again,
                what=f"gate {gate.type} {host}",
            )
        except _Again as exc:
            ok, detail = False, str(exc)
        return ok, host, redact_text(detail)

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(resolver=GuardedResolver(self._allow))
            self._session = aiohttp.ClientSession(connector=connector)
        return self._session

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
