"""What a webhook payload asks the load tester for, checked against the operator's limits. Pure.

The payload is Flagger's webhook shape, so a rollout hook written for flagger-loadtester needs
only new metadata::

    {"name": "app", "namespace": "shop", "phase": "Progressing", "checksum": "...",
     "type": "rollout",
     "metadata": {"url": "http://app-canary.shop:80/", "rps": "20", "duration": "1m",
                  "method": "GET"}}

Metadata values are strings (Flagger's metadata is map[string]string); numbers in JSON are
accepted too. Every refusal is a `BadRequest` naming the key, so the rollout's webhook log
says what to fix.

The load tester must not be an open traffic cannon: a URL is accepted only when its host is
a name matching an allowed pattern (by default cluster-internal Service names, `*.svc` and
`*.svc.cluster.local`, plus `--allow-host`) or an IP literal inside an `--allow-cidr`. Names
are checked again at connection time (generator.GuardedResolver): an address that is
loopback, link-local, unspecified or the API server's is refused unless an allowed CIDR holds
it or the operator named the host exactly.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit

__all__ = [
    "DEFAULT_ALLOWED_HOSTS",
    "HOOK_TYPES",
    "METHODS",
    "BadRequest",
    "Limits",
    "LoadRequest",
    "TargetPolicy",
    "parse_duration",
    "parse_payload",
]

DEFAULT_ALLOWED_HOSTS = ("*.svc", "*.svc.cluster.local")
METHODS = ("GET", "HEAD")  # load without a body: nothing the target could mistake for input
# Hook types that start or extend load, and the one that stops it. Others are refused: a
# 200 to Flagger's "rollback" hook would mean "roll back now".
START_TYPES = ("", "pre-rollout", "rollout")
STOP_TYPES = ("post-rollout",)
HOOK_TYPES = START_TYPES + STOP_TYPES
# `at` is the controller's (where the planner counts the load: entry or canary); accepted so
# one metadata object serves both, and checked so a typo is named here too.
METADATA_KEYS = ("url", "rps", "duration", "method", "at")
_MAX_TEXT = 2048  # characters in any one string of the payload
_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")  # a DNS-1123 name (or empty)
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


class BadRequest(ValueError):
    """A payload the load tester refuses; `key` is what to fix ("metadata.rps", ...)."""

    def __init__(self, key: str, message: str, *, status: int = 400) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.status = status


@dataclass(frozen=True, slots=True)
class Limits:
    """The operator's bounds on what a payload may ask for."""

    max_rps: float = 200.0
    max_duration_s: float = 3600.0
    max_jobs: int = 32
    timeout_s: float = 5.0  # per request
    max_in_flight: int = 256  # per job; beyond it a slot is dropped, never queued

    def __post_init__(self) -> None:
        for key, value in (
            ("max_rps", self.max_rps),
            ("max_duration_s", self.max_duration_s),
            ("timeout_s", self.timeout_s),
        ):
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{key} must be a positive number, got {value!r}")
        if self.max_jobs < 1 or self.max_in_flight < 1:
            raise ValueError("max_jobs and max_in_flight must be at least 1")


def parse_duration(text: str) -> float:
    """Seconds from a Go-style duration ("90s", "1m30s", "2h", "500ms") or plain seconds."""
    value = text.strip()
    try:
        seconds = float(value)
    except ValueError:
        pos, seconds = 0, 0.0
        for match in _DURATION_PART.finditer(value):
            if match.start() != pos:
                break
            seconds += float(match.group(1)) * _UNITS[match.group(2)]
            pos = match.end()
        if pos != len(value) or not value:
            raise ValueError(f"{text[:40]!r} is not a duration like 30s, 1m or 1m30s") from None
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"{text[:40]!r} is not a positive duration")
    return seconds


def _cidrs(values: Iterable[str]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    networks = []
    for value in values:
        try:
            networks.append(ipaddress.ip_network(value.strip(), strict=False))
        except ValueError:
            raise ValueError(
                f"--allow-cidr: {value[:60]!r} is not a CIDR like 10.0.0.0/8"
            ) from None
    return tuple(networks)


@dataclass(frozen=True, slots=True)
class TargetPolicy:
    """Which hosts load may be sent to (see the module docstring)."""

    hosts: tuple[str, ...] = DEFAULT_ALLOWED_HOSTS  # fnmatch patterns, lower case
    cidrs: tuple[str, ...] = ()
    _networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = field(
        init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "hosts", tuple(h.lower().rstrip(".") for h in self.hosts))
        object.__setattr__(self, "_networks", _cidrs(self.cidrs))

    @classmethod
    def with_defaults(cls, *, hosts: Iterable[str] = (), cidrs: Iterable[str] = ()) -> TargetPolicy:
        """The default Service-name patterns plus the operator's."""
        return cls(hosts=(*DEFAULT_ALLOWED_HOSTS, *hosts), cidrs=tuple(cidrs))

    def address_allowed(self, address: str) -> bool:
        """Whether an allowed CIDR holds this IP address."""
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in network for network in self._networks)

    def named_exactly(self, host: str) -> bool:
        """Whether the operator named this host without a wildcard (trusted at any address)."""
        return host.lower().rstrip(".") in self.hosts

    def refusal(self, host: str) -> str | None:
        """Why load may not go to `host` (a name or an IP literal), or None when it may."""
        bare = host.strip("[]").lower().rstrip(".")
        try:
            ipaddress.ip_address(bare.split("%", 1)[0])
        except ValueError:
            if any(fnmatch.fnmatchcase(bare, pattern) for pattern in self.hosts):
                return None
            allowed = ", ".join(self.hosts) or "none"
            return f"host {bare[:100]!r} is not allowed (allowed: {allowed}; see --allow-host)"
        if self.address_allowed(bare):
            return None
        return f"address {bare!r} is not in an allowed CIDR (see --allow-cidr)"


@dataclass(frozen=True, slots=True)
class LoadRequest:
    """One accepted payload: who asks, where load goes, how much and how long."""

    namespace: str
    name: str
    url: str
    rps: float
    duration_s: float
    method: str
    action: Literal["start", "stop"]
    phase: str = ""

    @property
    def key(self) -> tuple[str, str, str]:
        """A job's identity: repeated calls with the same key extend one job."""
        return (self.namespace, self.name, self.url)


def _text(value: Any, key: str, *, required: bool = False) -> str:
    if value is None:
        if required:
            raise BadRequest(key, "is required")
        return ""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise BadRequest(key, f"must be a string, got {type(value).__name__}")
    text = str(value)
    if len(text) > _MAX_TEXT:
        raise BadRequest(key, f"is longer than {_MAX_TEXT} characters")
    if required and not text.strip():
        raise BadRequest(key, "is required")
    return text


def _url(text: str, policy: TargetPolicy) -> str:
    key = "metadata.url"
    try:
        parts = urlsplit(text.strip())
        host = parts.hostname
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError as exc:
        raise BadRequest(key, f"is not a URL ({exc})") from None
    if parts.scheme not in ("http", "https"):
        raise BadRequest(key, "must be an http:// or https:// URL")
    if not host:
        raise BadRequest(key, "has no host")
    if parts.username is not None or parts.password is not None:
        # Credentials would end up in /jobs and the logs; load tests need none.
        raise BadRequest(key, "must not carry credentials (user:password@)")
    if parts.fragment:
        raise BadRequest(key, "must not have a #fragment")
    why = policy.refusal(host)
    if why is not None:
        raise BadRequest(key, why, status=403)
    return text.strip()


def parse_payload(body: Any, *, limits: Limits, policy: TargetPolicy) -> LoadRequest:
    """The load a webhook payload asks for, or BadRequest naming the key that is wrong."""
    if not isinstance(body, Mapping):
        raise BadRequest("body", "must be a JSON object (a Flagger webhook payload)")
    name = _text(body.get("name"), "name", required=True)
    namespace = _text(body.get("namespace"), "namespace")
    for key, value in (("name", name), ("namespace", namespace)):
        if value and not _NAME.fullmatch(value):
            raise BadRequest(key, f"{value[:60]!r} is not a Kubernetes name")
    hook = _text(body.get("type"), "type")
    if hook not in HOOK_TYPES:
        raise BadRequest(
            "type", f"{hook[:40]!r}: canary loadtest serves {', '.join(HOOK_TYPES[1:])} hooks"
        )
    metadata = body.get("metadata")
    if not isinstance(metadata, Mapping):
        raise BadRequest("metadata", "is required: an object with url, rps and duration")
    for key in metadata:
        if key not in METADATA_KEYS:
            raise BadRequest(
                f"metadata.{str(key)[:40]}", f"is not known (known: {', '.join(METADATA_KEYS)})"
            )
    url = _url(_text(metadata.get("url"), "metadata.url", required=True), policy)
    method = (_text(metadata.get("method"), "metadata.method") or "GET").upper()
    if method not in METHODS:
        raise BadRequest("metadata.method", f"{method[:20]!r} is not one of {', '.join(METHODS)}")
    at = _text(metadata.get("at"), "metadata.at")
    if at not in ("", "entry", "canary"):
        raise BadRequest("metadata.at", f"{at[:20]!r} is not entry or canary")
    action: Literal["start", "stop"] = "stop" if hook in STOP_TYPES else "start"
    rps, duration_s = 0.0, 0.0
    if action == "start":
        rps_text = _text(metadata.get("rps"), "metadata.rps", required=True)
        try:
            rps = float(rps_text)
        except ValueError:
            raise BadRequest("metadata.rps", f"{rps_text[:40]!r} is not a number") from None
        if not (math.isfinite(rps) and 0 < rps <= limits.max_rps):
            raise BadRequest(
                "metadata.rps", f"must be within (0, {limits.max_rps:g}], got {rps_text[:40]}"
            )
        duration_text = _text(metadata.get("duration"), "metadata.duration", required=True)
        try:
            duration_s = parse_duration(duration_text)
        except ValueError as exc:
            raise BadRequest("metadata.duration", str(exc)) from None
        if duration_s > limits.max_duration_s:
            raise BadRequest(
                "metadata.duration",
                f"{duration_text[:40]} is longer than the maximum {limits.max_duration_s:g} s",
            )
    return LoadRequest(
        namespace=namespace,
        name=name,
        url=url,
        rps=rps,
        duration_s=duration_s,
        method=method,
        action=action,
        phase=_text(body.get("phase"), "phase")[:64],
    )
