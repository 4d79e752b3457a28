"""PowerDNS router against a real pdns_server on loopback: weights split real DNS answers."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from canary.dns import query
from canary.routers import RouterError, RouterRejected, RouterUnreachable, set_and_verify
from canary.routers.powerdns import PowerDNSRouter, build_lua, parse_lua

SCHEMA = Path("/usr/share/doc/pdns-backend-sqlite3/schema.sqlite3.sql")
API_KEY = "canary-test-key"
PRIMARY, CANARY = "127.0.0.10", "127.0.0.20"


def _free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _free_port_both() -> int:
    """A port free for both UDP and TCP, since pdns listens on both."""
    for _ in range(50):
        port = _free_port(socket.SOCK_DGRAM)
        with socket.socket() as tcp:
            try:
                tcp.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError("no free UDP+TCP port")


@dataclass
class PdnsServer:
    dns_port: int
    api_url: str
    zone: str = "example.test."


@pytest.fixture(scope="module")
def pdns(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PdnsServer]:
    binary = shutil.which("pdns_server") or "/usr/sbin/pdns_server"
    assert os.path.exists(binary), "pdns_server is missing: run scripts/setup --all"
    workdir = tmp_path_factory.mktemp("pdns")
    db = workdir / "pdns.sqlite3"
    with sqlite3.connect(db) as conn:
        conn.executescript(SCHEMA.read_text())
    dns_port, api_port = _free_port_both(), _free_port()
    (workdir / "pdns.conf").write_text(
        "\n".join(
            [
                "launch=gsqlite3",
                f"gsqlite3-database={db}",
                "local-address=127.0.0.1",
                f"local-port={dns_port}",
                "api=yes",
                f"api-key={API_KEY}",
                "webserver=yes",
                "webserver-address=127.0.0.1",
                f"webserver-port={api_port}",
                "webserver-allow-from=127.0.0.0/8",
                "enable-lua-records=yes",
                # Every answer is computed afresh, so the split we count is pickwrandom's own.
                "cache-ttl=0",
                "query-cache-ttl=0",
                "negquery-cache-ttl=0",
                "zone-cache-refresh-interval=0",
                f"socket-dir={workdir}",
                "guardian=no",
                "daemon=no",
                "disable-syslog=yes",
                "write-pid=no",
                "loglevel=4",
            ]
        )
        + "\n"
    )
    log = (workdir / "pdns.log").open("w")
    proc = subprocess.Popen(
        [binary, f"--config-dir={workdir}"],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        api_url = f"http://127.0.0.1:{api_port}"
        deadline = time.monotonic() + 20
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"pdns_server exited: {(workdir / 'pdns.log').read_text()[-2000:]}"
                )
            try:
                with socket.create_connection(("127.0.0.1", api_port), timeout=0.2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("pdns_server API did not come up") from None
                time.sleep(0.1)
        server = PdnsServer(dns_port=dns_port, api_url=api_url)
        asyncio.run(_create_zone(server))
        yield server
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


async def _create_zone(server: PdnsServer) -> None:
    zone = {
        "name": server.zone,
        "kind": "Native",
        "nameservers": [],
        "rrsets": [
            {
                "name": server.zone,
                "type": "SOA",
                "ttl": 60,
                "records": [
                    {
                        "content": "ns1.example.test. hostmaster.example.test. 1 10800 3600 604800 60",
                        "disabled": False,
                    }
                ],
            },
            {
                "name": server.zone,
                "type": "NS",
                "ttl": 60,
                "records": [{"content": "ns1.example.test.", "disabled": False}],
            },
        ],
    }
    async with (
        aiohttp.ClientSession(headers={"X-API-Key": API_KEY}) as session,
        session.post(f"{server.api_url}/api/v1/servers/localhost/zones", json=zone) as response,
    ):
        assert response.status == 201, await response.text()


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
        api_url=f"http://127.0.0.1:{_free_port()}",
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
