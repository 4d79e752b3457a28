"""PowerDNS router: DNS weights between two clusters' entry points with a LUA `pickwrandom` record.

The service's name gets one LUA record, e.g.::

    app.example.test. 5 IN LUA A "pickwrandom({{90,'192.0.2.10'},{10,'192.0.2.20'}})"

written through the PowerDNS HTTP API. PowerDNS stores a LUA record with a syntax error
without complaint and then answers SERVFAIL for the name, so:

- before writing, the content is built from a fixed template out of validated parts only
  (integer weights, addresses checked by `ipaddress` or as DNS names) and re-parsed;
- after writing, the RRset is read back through the API and, when `dns_port` is given, the
  name is resolved against the server itself: anything but NOERROR with an answer is an error.

Weights are read back by parsing the record: a record that canary did not write (hand-edited,
another format) is reported as such, never guessed at.
"""

from __future__ import annotations

import ipaddress
import re
from json import loads as json_loads
from typing import Any

import aiohttp

from canary.core.redact import redact_text, redact_url
from canary.dnsquery import DnsError
from canary.dnsquery import query as dns_query
from canary.httpio import AnswerTooLarge, read_bounded
from canary.routers.base import RouterError, RouterRejected, RouterUnreachable

__all__ = ["PowerDNSRouter", "build_lua", "parse_lua"]

# A zone's answer holds every rrset of the zone: generous, but not whatever the server sends.
MAX_ANSWER_BYTES = 64 * 1024 * 1024

_DNS_NAME = re.compile(
    r"^(?=.{1,253}\.?$)([A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.?$"
)
_ENTRY = re.compile(r"\{(\d{1,3}),'([^'{}]+)'\}")
_CONTENT = re.compile(r'^(A|AAAA|CNAME) "pickwrandom\(\{((?:\{\d{1,3},\'[^\'{}]+\'\},?)+)\}\)"$')


def _record_type(address: str) -> str:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        if not _DNS_NAME.match(address):
            raise ValueError(
                f"entry point {address!r} is neither an IP address nor a DNS name"
            ) from None
        return "CNAME"
    return "A" if ip.version == 4 else "AAAA"


def build_lua(primary: str, canary: str, canary_percent: int) -> str:
    """The LUA record content for a split. Raises ValueError for anything unsafe to write."""
    if not isinstance(canary_percent, int) or not 0 <= canary_percent <= 100:
        raise ValueError(f"canary_percent must be an integer within 0..100, got {canary_percent!r}")
    rtype = _record_type(primary)
    if _record_type(canary) != rtype:
        raise ValueError(f"entry points {primary!r} and {canary!r} are of different record types")
    if primary == canary:
        raise ValueError("primary and canary entry points must differ")
    # A zero weight is left out: pickwrandom never needs to consider it.
    entries = [(100 - canary_percent, primary), (canary_percent, canary)]
    body = ",".join(f"{{{w},'{address}'}}" for w, address in entries if w > 0)
    content = f'{rtype} "pickwrandom({{{body}}})"'
    parse_lua(content, primary, canary)  # the template and the parser must agree
    return content


def parse_lua(content: str, primary: str, canary: str) -> int:
    """The canary percent encoded in a record canary wrote. Raises RouterError otherwise."""
    match = _CONTENT.match(content.strip())
    if not match:
        raise RouterError(f"the LUA record was not written by canary: {content!r}")
    weights = {address: int(w) for w, address in _ENTRY.findall(match.group(2))}
    unknown = set(weights) - {primary, canary}
    if unknown:
        raise RouterError(
            f"the LUA record names unknown entry points {sorted(unknown)}: {content!r}"
        )
    primary_w, canary_w = weights.get(primary, 0), weights.get(canary, 0)
    if primary_w + canary_w == 0:
        raise RouterError(f"the LUA record has no weight at all: {content!r}")
    return round(100 * canary_w / (primary_w + canary_w))


class PowerDNSRouter:
    """TrafficRouter over the PowerDNS HTTP API (`/api/v1/servers/{server}/zones/{zone}`)."""

    def __init__(
        self,
        *,
        api_url: str,
        api_key: str,
        zone: str,
        record_name: str,
        primary_address: str,
        canary_address: str,
        ttl: int = 5,
        server_id: str = "localhost",
        dns_server: str | None = None,
        dns_port: int = 53,
        timeout_s: float = 5.0,
        name: str = "powerdns",
    ) -> None:
        self.name = name
        self.zone = zone if zone.endswith(".") else zone + "."
        self.record_name = record_name if record_name.endswith(".") else record_name + "."
        if not self.record_name.endswith(self.zone):
            raise ValueError(f"record_name {record_name!r} is not inside zone {zone!r}")
        if ttl < 1:
            raise ValueError(f"ttl must be at least 1 second, got {ttl}")
        self.primary_address = primary_address
        self.canary_address = canary_address
        self.rtype = _record_type(primary_address)
        build_lua(primary_address, canary_address, 0)  # fail at construction on bad addresses
        self.ttl = ttl
        self._zone_url = f"{api_url.rstrip('/')}/api/v1/servers/{server_id}/zones/{self.zone}"
        self._headers = {"X-API-Key": api_key}
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._dns = (dns_server, dns_port) if dns_server else None

    async def _request(self, method: str, json: Any = None) -> Any:
        what = f"{method} {redact_url(self._zone_url)}"
        try:
            async with (
                aiohttp.ClientSession(timeout=self._timeout, headers=self._headers) as session,
                session.request(method, self._zone_url, json=json) as response,
            ):
                try:
                    raw = await read_bounded(response, MAX_ANSWER_BYTES)
                except AnswerTooLarge as exc:
                    raise RouterRejected(what, f"HTTP {response.status}: {exc}") from None
                text = raw.decode("utf-8", "replace")
                if response.status >= 400:
                    try:
                        message = str(json_loads(text)["error"])
                    except (ValueError, KeyError, TypeError):
                        message = text[:500] or response.reason or ""
                    raise RouterRejected(what, f"HTTP {response.status}: {message}")
                try:
                    return json_loads(text) if text else None
                except ValueError as exc:
                    raise RouterRejected(what, f"not JSON: {exc}") from None
        except (aiohttp.ClientConnectionError, TimeoutError) as exc:
            detail = redact_text(str(exc))
            raise RouterUnreachable(f"PowerDNS API unreachable ({what}): {detail}") from exc

    async def set_weight(self, canary_percent: int) -> None:
        content = build_lua(self.primary_address, self.canary_address, canary_percent)
        rrset = {
            "name": self.record_name,
            "type": "LUA",
            "ttl": self.ttl,
            "changetype": "REPLACE",
            "records": [{"content": content, "disabled": False}],
        }
        await self._request("PATCH", {"rrsets": [rrset]})
        await self._check_resolves()

    async def get_weight(self) -> int:
        zone = await self._request("GET")
        for rrset in zone.get("rrsets", []):
            if rrset.get("name") == self.record_name and rrset.get("type") == "LUA":
                records = [r for r in rrset.get("records", []) if not r.get("disabled")]
                if len(records) != 1:
                    raise RouterError(
                        f"{self.record_name} has {len(records)} enabled LUA records, expected 1"
                    )
                return parse_lua(records[0]["content"], self.primary_address, self.canary_address)
        raise RouterError(f"{self.record_name} has no LUA record in zone {self.zone}")

    async def _check_resolves(self) -> None:
        if self._dns is None:
            return
        server, port = self._dns
        try:
            answer = await dns_query(server, port, self.record_name, self.rtype)
        except DnsError as exc:
            raise RouterUnreachable(f"could not verify {self.record_name} over DNS: {exc}") from exc
        if answer.rcode != "NOERROR" or not answer.addresses:
            raise RouterRejected(
                f"resolve {self.record_name} {self.rtype}",
                f"{answer.rcode} with {len(answer.addresses)} answers after writing the LUA record",
            )
