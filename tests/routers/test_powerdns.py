"""PowerDNS router against a real pdns_server on loopback: weights split real DNS answers."""

from __future__ import annotations

import asyncio
from collections import Counter

import aiohttp
import pytest
from support.pdns import API_KEY, PdnsServer, free_port, pdns

from canary.dnsquery import query
from canary.routers import RouterError, RouterRejected, RouterUnreachable, set_and_verify
from canary.routers.powerdns import PowerDNSRouter, build_lua, parse_lua

PRIMARY, CANARY = "127.0.0.10", "127.0.0.20"
__all__ = ["pdns"]  # the fixture, imported so pytest finds it


def router(pdns: PdnsServer, name: str = "app.example.test", **kwargs: object) -> PowerDNSRouter:
    return PowerDNSRouter(
        api_url=pdns.api_url,
        api_key=API_KEY,
        zone=pdns.zone,
        record_name=name,
        primary_address=kwargs.pop("primary", PRIMARY),  # type: ignore[arg-type]
        canary_address=kwargs.pop("canary", CANARY),  # type: ignore[arg-type]
        dns_server="127.0.0.1",
        dns_port=pdns.dns_port,
        **kwargs,  # type: ignore[arg-type]
    )


async def count_answers(pdns: PdnsServer, name: str, n: int) -> Counter[str]:
    counts: Counter[str] = Counter()
    sem = asyncio.Semaphore(50)

    async def one() -> None:
        async with sem:
            answer = await query("127.0.0.1", pdns.dns_port, name)
            assert answer.rcode == "NOERROR"
            counts.update(answer.addresses)

    await asyncio.gather(*(one() for _ in range(n)))
    return counts


@pytest.mark.parametrize("weight", [0, 10, 25, 50, 100])
async def test_weights_split_real_dns_answers(pdns: PdnsServer, weight: int) -> None:
    """The weight set is read back, and real DNS answers follow it within 4 percentage points."""
    r = router(pdns)
    assert await set_and_verify(r, weight) == weight
    counts = await count_answers(pdns, "app.example.test", 2000)
    share = 100 * counts[CANARY] / (counts[CANARY] + counts[PRIMARY])
    assert abs(share - weight) <= 4, (weight, counts)


async def test_answers_carry_the_short_ttl(pdns: PdnsServer) -> None:
    """Resolvers re-ask every `ttl` seconds, which bounds how long a weight change takes."""
    r = router(pdns, name="ttl.example.test", ttl=3)
    await r.set_weight(30)
    answer = await query("127.0.0.1", pdns.dns_port, "ttl.example.test")
    assert answer.ttl == 3


async def test_a_record_not_written_by_canary_is_reported(pdns: PdnsServer) -> None:
    """A hand-edited LUA record is named as foreign, not misread as some weight."""
    rrset = {
        "name": "hand.example.test.",
        "type": "LUA",
        "ttl": 5,
        "changetype": "REPLACE",
        "records": [
            {"content": "A \"pickrandom({'127.0.0.10','127.0.0.20'})\"", "disabled": False}
        ],
    }
    async with (
        aiohttp.ClientSession(headers={"X-API-Key": API_KEY}) as session,
        session.patch(
            f"{pdns.api_url}/api/v1/servers/localhost/zones/{pdns.zone}", json={"rrsets": [rrset]}
        ) as resp,
    ):
        assert resp.status == 204
    with pytest.raises(RouterError, match="not written by canary"):
        await router(pdns, name="hand.example.test").get_weight()


async def test_broken_lua_is_caught_by_verification(pdns: PdnsServer) -> None:
    """PowerDNS stores bad Lua silently and answers SERVFAIL; the DNS check turns that into an error."""
    r = router(pdns, name="broken.example.test")
    rrset = {
        "name": "broken.example.test.",
        "type": "LUA",
        "ttl": 5,
        "changetype": "REPLACE",
        "records": [{"content": "A \"pickwrandom({{90,'127.0.0.10'}\"", "disabled": False}],
    }
    async with (
        aiohttp.ClientSession(headers={"X-API-Key": API_KEY}) as session,
        session.patch(
            f"{pdns.api_url}/api/v1/servers/localhost/zones/{pdns.zone}", json={"rrsets": [rrset]}
        ) as resp,
    ):
        assert resp.status == 204  # accepted without complaint
    answer = await query("127.0.0.1", pdns.dns_port, "broken.example.test")
    assert answer.rcode == "SERVFAIL"
    with pytest.raises(RouterRejected, match="SERVFAIL"):
        await r._check_resolves()
    await r.set_weight(20)  # canary's own template repairs it
    assert await r.get_weight() == 20


async def test_api_errors_are_typed(pdns: PdnsServer) -> None:
    """A wrong API key is RouterRejected with the server's text; a dead port is RouterUnreachable."""
    bad_key = PowerDNSRouter(
        api_url=pdns.api_url,
        api_key="wrong",
        zone=pdns.zone,
        record_name="app.example.test",
        primary_address=PRIMARY,
        canary_address=CANARY,
    )
    with pytest.raises(RouterRejected, match="HTTP 401"):
        await bad_key.set_weight(10)
    dead = PowerDNSRouter(
        api_url=f"http://127.0.0.1:{free_port()}",
        api_key=API_KEY,
        zone=pdns.zone,
        record_name="app.example.test",
        primary_address=PRIMARY,
        canary_address=CANARY,
    )
    with pytest.raises(RouterUnreachable):
        await dead.get_weight()


@pytest.mark.parametrize(
    ("primary", "canary", "weight", "message"),
    [
        ("127.0.0.1", "127.0.0.2", 101, "within 0..100"),
        ("127.0.0.1", "::1", 10, "different record types"),
        ("127.0.0.1", "x'); os.exit() --", 10, "neither an IP address nor a DNS name"),
        ("127.0.0.1", "127.0.0.1", 10, "must differ"),
    ],
)
def test_content_is_validated_before_writing(
    primary: str, canary: str, weight: int, message: str
) -> None:
    """Only validated parts go into the Lua template: bad input never reaches PowerDNS."""
    with pytest.raises(ValueError, match=message):
        build_lua(primary, canary, weight)


@pytest.mark.parametrize("weight", [0, 1, 33, 99, 100])
def test_build_and_parse_round_trip(weight: int) -> None:
    """Every weight survives being written as Lua and read back."""
    assert (
        parse_lua(
            build_lua("lb-a.example.net", "lb-b.example.net", weight),
            "lb-a.example.net",
            "lb-b.example.net",
        )
        == weight
    )
