"""Two-cluster notifications: a service's webhooks hear of every failover and failback.

The wiring is the whole two-cluster controller of test_multicluster_failover (emulated
clusters, real PowerDNS, the server with /failover, the `canary` CLI as a process); the
webhook is a real aiohttp server on 127.0.0.1 that keeps what it is sent.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from support.pdns import API_KEY, PdnsServer, free_port, pdns
from support.web import on_loopback
from test_multicluster_failover import NS, _probed, deployment, running, wait_for, weight_is

from canary.clusters.topology import parse_topology
from canary.notify.webhooks import report_id
from canary.reports.pages import register_routes
from canary.server.app import Server
from canary.static.config import ConfigError

__all__ = ["pdns"]

REPORTS = "https://canary.example.internal"


@pytest.fixture(autouse=True)
def _api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PDNS_API_KEY", API_KEY)


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[str, list[dict[str, Any]]]]:
    """A webhook receiver on loopback: its URL and the JSON bodies it got."""
    received: list[dict[str, Any]] = []

    async def hook(request: web.Request) -> web.Response:
        received.append(await request.json())
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    try:
        yield f"http://127.0.0.1:{port}/hook", received
    finally:
        await runner.cleanup()


async def test_manual_failover_and_failback_each_send_a_failover_notification(
    pdns: PdnsServer, tmp_path: Any, receiver: tuple[str, list[dict[str, Any]]]
) -> None:
    """`canary failover --to standby` and `canary failback` each deliver a Slack-compatible failover message with who, why and the report link."""
    url, received = receiver
    hooks = [{"url": url, "events": ["failover"], "report_base_url": REPORTS, "backoff_s": 0.1}]
    async with running(pdns, tmp_path, name="notify", webhooks=hooks) as env:
        await wait_for(lambda: weight_is(env, 10), 10, "the steady 10%")
        await wait_for(lambda: _probed(env), 5, "a first probe")
        code, _, err = await env.cli("failover", "--to", "standby", "--reason", "maintenance")
        assert code == 0, err

        async def got(n: int) -> bool:
            return len(received) >= n

        await wait_for(lambda: got(1), 5, "the failover notification")
        code, _, err = await env.cli("failback", "--reason", "all clear")
        assert code == 0, err
        await wait_for(lambda: got(2), 5, "the failback notification")
    texts = [body["text"] for body in received]
    assert len(texts) == 2, texts
    assert "shop: failover to-standby: maintenance" in texts[0]
    assert "shop: failover to-primary: all clear" in texts[1]
    for body in received:
        assert body["text"].endswith(f"Report: {REPORTS}/reports/shop")
        fields = [f["text"] for block in body["blocks"] for f in block.get("fields", [])]
        assert "*By*\ndana" in fields
        buttons = [e["url"] for block in body["blocks"] for e in block.get("elements", [])]
        assert buttons == [f"{REPORTS}/reports/shop"]


async def test_a_cross_cluster_rollout_aborted_by_hand_notifies_and_links_its_report(
    pdns: PdnsServer, tmp_path: Any, receiver: tuple[str, list[dict[str, Any]]]
) -> None:
    """`canary abort` of a rollout held at 50% sends the manual action and the rollback, each linking to a report that the reports routes serve."""
    url, received = receiver
    hooks = [{"url": url, "report_base_url": REPORTS, "backoff_s": 0.1}]
    async with running(pdns, tmp_path, name="abort", webhooks=hooks) as env:
        await wait_for(lambda: weight_is(env, 10), 10, "the steady 10%")
        env.canary_api.put("apps", "v1", "deployments", deployment("shop:2"))
        await wait_for(lambda: weight_is(env, 50), 10, "the rollout's 50%")
        code, out, err = await env.cli("abort", "shop", "--reason", "bad build")
        assert code == 0, (out, err)

        async def got(n: int) -> bool:
            return len(received) >= n

        await wait_for(lambda: got(2), 5, "the manual and rollback notifications")
        rollout = env.service.rollouts.runner.state()["rollout"]
    link = f"{REPORTS}/reports/{report_id(rollout)}"
    texts = {body["text"].split(" ", 1)[1] for body in received}
    assert f"shop: dana ran abort: bad build Report: {link}" in texts, texts
    assert any(t.startswith("shop: aborted: ") and t.endswith(link) for t in texts), texts
    # The links resolve where `canary clusters` serves reports: by id, and a failover's by name.
    app = web.Application()
    register_routes(app, record_dir=env.topology.record_dir)
    async with Server(app) as server, aiohttp.ClientSession() as session:
        for path in (f"/reports/{report_id(rollout)}", "/reports/shop"):
            async with session.get(server.url + path) as response:
                assert response.status == 200, (path, await response.text())
                assert "bad build" in await response.text()


async def test_a_confirm_rollout_gate_holds_a_cross_cluster_rollout_until_it_opens(
    pdns: PdnsServer, tmp_path: Any
) -> None:
    """A service's `confirm-rollout` gate (a webhook with a `type`, as in a static config)
    is asked with Flagger's payload: closed (403), the new template waits at the steady 10%;
    open, the DNS weight moves to the rollout's 50%. The service's notifications do not get
    the gate's calls, nor the gate theirs."""
    calls: list[dict[str, Any]] = []
    notified: list[dict[str, Any]] = []
    gate_open = False

    async def gate(request: web.Request) -> web.Response:
        calls.append(await request.json())
        return web.Response(status=200 if gate_open else 403, text="go" if gate_open else "wait")

    async def notification(request: web.Request) -> web.Response:
        notified.append(await request.json())
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/gate", gate)
    app.router.add_post("/notify", notification)
    async with on_loopback(app) as url:
        hooks = [
            {"type": "confirm-rollout", "url": f"{url}/gate", "metadata": {"team": "shop"}},
            {"url": f"{url}/notify", "events": ["manual"], "backoff_s": 0.1},
        ]
        async with running(pdns, tmp_path, name="gated", webhooks=hooks) as env:
            await wait_for(lambda: weight_is(env, 10), 10, "the steady 10%")
            env.canary_api.put("apps", "v1", "deployments", deployment("shop:2"))

            async def asked(n: int) -> bool:
                return len(calls) >= n

            await wait_for(lambda: asked(3), 10, "the gate asked on three ticks")
            assert await weight_is(env, 10)  # held while closed
            gate_open = True
            await wait_for(lambda: weight_is(env, 50), 10, "the rollout's 50% once open")
    assert {c["type"] for c in calls} == {"confirm-rollout"}, calls
    first = calls[0]
    assert (first["name"], first["namespace"], first["metadata"]) == ("shop", NS, {"team": "shop"})
    assert first["phase"] == "Initializing" and first["checksum"], first
    assert notified == [], notified


def _topology(webhooks: list[dict[str, Any]]) -> dict[str, Any]:
    """A minimal topology whose one service has these webhooks."""
    return {
        "clusters": {
            "primary": {
                "name": "eu-1",
                "entry_point": "192.0.2.10",
                "prometheus": {"url": "http://p:9090"},
            },
            "canary": {
                "name": "eu-2",
                "entry_point": "192.0.2.20",
                "prometheus": {"url": "http://q:9090"},
            },
        },
        "services": [
            {
                "name": "shop",
                "dns_name": "shop.example.com",
                "deployment": "shop",
                "router": {"kind": "haproxy", "socket": "/run/h.sock", "backend": "b"},
                "webhooks": webhooks,
            }
        ],
    }


def test_a_gate_in_a_topology_is_checked_by_name() -> None:
    """An unknown gate kind is a config error naming the entry and the kinds there are; a
    known one is a gate of the rollout, not a notification."""
    typo = [{"type": "confirm-promotions", "url": "https://gates.example/x"}]
    with pytest.raises(ConfigError, match=r"services\[0\]\.webhooks\[0\]\.type: must be one of"):
        parse_topology(_topology(typo))
    hooks = [
        {"type": "confirm-promotion", "url": "https://gates.example/x"},
        {"url": "https://hooks.example/x"},
    ]
    parsed = parse_topology(_topology(hooks)).services[0]
    assert [g.type for g in parsed.gates] == ["confirm-promotion"]
    assert [h.url for h in parsed.notifications] == ["https://hooks.example/x"]
    assert parsed.rollout_spec().gates == ("confirm-promotion",)


def test_a_bad_webhook_in_a_topology_is_named() -> None:
    """A service's webhook with a non-HTTP URL is a config error naming services[0].webhooks."""
    with pytest.raises(ConfigError, match=r"services\[0\]\.webhooks\[0\]\.url: .*http"):
        parse_topology(_topology([{"url": "ftp://hooks.example/x"}]))
    parsed = parse_topology(_topology([{"url": "https://hooks.example/x"}]))
    assert parsed.services[0].webhooks[0].url == "https://hooks.example/x"
