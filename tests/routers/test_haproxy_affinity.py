"""Cookie session affinity and the A/B map on a real HAProxy: which server a real client
with a real cookie jar reaches as the router moves weights, rolls back and promotes.

HAProxy's cookie persistence keeps a client on its server while weights move (sticky), but
also sends it to a server at weight 0; the router therefore puts a server that must get no
traffic in maintenance. Each test below shows both halves with real requests.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from support.pool import ProcessPool

from canary.demo.procs import HAProxyConfig, HAProxyProcess, free_port
from canary.routers.base import Match, set_and_verify
from canary.routers.haproxy import HAProxyRouter, runtime_command

MATCH = Match.header("X-Canary=always")


@pytest.fixture
def haproxy(
    procs: ProcessPool, workdir: Path, sockdir: Path, haproxy_binary: str
) -> Iterator[HAProxyConfig]:
    primary_port, canary_port = free_port(), free_port()
    procs.support_server("name", primary_port, "primary")
    procs.support_server("name", canary_port, "canary")
    config = HAProxyConfig(
        frontend_port=free_port(),
        primary_addr=f"127.0.0.1:{primary_port}",
        canary_addr=f"127.0.0.1:{canary_port}",
        socket_path=sockdir / "admin.sock",
        state_file=workdir / "server-state",
        ab_match=MATCH,
        ab_map=workdir / "app-ab.map",
        cookie="SRV",
    )
    procs.start(HAProxyProcess(config, workdir=workdir, binary=haproxy_binary))
    yield config


def router(config: HAProxyConfig, *, ab: bool = False) -> HAProxyRouter:
    return HAProxyRouter(
        config.socket_path,
        "app",
        "primary",
        "canary",
        state_file=config.state_file,
        affinity="cookie",
        match=MATCH if ab else None,
        ab_map=config.ab_map if ab else None,
    )


def url(config: HAProxyConfig) -> str:
    return f"http://127.0.0.1:{config.frontend_port}/"


async def served(
    session: aiohttp.ClientSession, config: HAProxyConfig, n: int, **kwargs: object
) -> Counter[str]:
    seen: Counter[str] = Counter()
    for _ in range(n):
        async with session.get(url(config), **kwargs) as response:  # type: ignore[arg-type]
            assert response.status == 200, await response.text()
            seen[(await response.text()).strip()] += 1
    return seen


async def test_sticky_clients_follow_their_server_until_rollback_or_promotion(
    haproxy: HAProxyConfig,
) -> None:
    """A client that landed on the canary stays there when the weight drops from 50% to 10%
    (sticky); a rollback to 0% puts the canary in maintenance and that client is back on the
    primary; a promotion to 100% does the same for clients stuck on the primary."""
    sticky_canary = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
    sticky_primary = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
    forged = aiohttp.ClientSession(cookies={"SRV": "canary"})
    try:
        # As HAProxy is configured (canary at weight 0 but ready), persistence reaches it:
        # this is what the router's maintenance step is for.
        assert await served(forged, haproxy, 5) == {"canary": 5}
        r = router(haproxy)
        assert await set_and_verify(r, 0, match=None) == 0
        assert await r.in_maintenance() == {"primary": False, "canary": True}
        assert await served(forged, haproxy, 5) == {"primary": 5}

        assert await set_and_verify(r, 50) == 50
        assert await r.in_maintenance() == {"primary": False, "canary": False}
        for client, name in ((sticky_canary, "canary"), (sticky_primary, "primary")):
            for _ in range(50):  # roundrobin at 50/50: a few requests land on each
                if await served(client, haproxy, 1) == {name: 1}:
                    break
            else:
                pytest.fail(f"never reached {name} at 50%")
        assert await set_and_verify(r, 10) == 10
        assert await served(sticky_canary, haproxy, 20) == {"canary": 20}
        assert await served(sticky_primary, haproxy, 20) == {"primary": 20}

        assert await set_and_verify(r, 0) == 0  # rollback
        assert await served(sticky_canary, haproxy, 10) == {"primary": 10}

        assert await set_and_verify(r, 100) == 100  # promotion
        assert await r.in_maintenance() == {"primary": True, "canary": False}
        assert await served(sticky_primary, haproxy, 10) == {"canary": 10}
    finally:
        for session in (sticky_canary, sticky_primary, forged):
            await session.close()


async def test_a_server_put_in_maintenance_by_hand_reads_as_weight_zero(
    haproxy: HAProxyConfig,
) -> None:
    """The canary put in maintenance behind the router's back at 50% reads back as 0%, so the
    runner sees the drift and sets the route again, which makes the canary ready."""
    r = router(haproxy)
    await set_and_verify(r, 50)
    await runtime_command(haproxy.socket_path, "set server app/canary state maint")
    assert await r.get_weight() == 0
    assert await set_and_verify(r, 50) == 50
    assert (await r.in_maintenance())["canary"] is False


async def test_ab_match_keeps_the_canary_ready_at_weight_zero(haproxy: HAProxyConfig) -> None:
    """With affinity and the A/B match on, the canary is at weight 0 but not in maintenance,
    so `use-server` can send it the matching requests; the match off puts it in maintenance."""
    r = router(haproxy, ab=True)
    async with aiohttp.ClientSession() as session:
        await set_and_verify(r, 0, match=True)
        assert await r.in_maintenance() == {"primary": False, "canary": False}
        assert await served(session, haproxy, 5, headers={"X-Canary": "always"}) == {"canary": 5}
        assert await served(session, haproxy, 5) == {"primary": 5}
        await set_and_verify(r, 0, match=False)
        assert await r.in_maintenance() == {"primary": False, "canary": True}
        assert await served(session, haproxy, 5, headers={"X-Canary": "always"}) == {"primary": 5}
        assert haproxy.ab_map is not None and haproxy.ab_map.read_text() == ""
