"""Answers with a body that never ends (or is merely huge) cost at most a bound, not the
controller's memory: the shared readers (canary.httpio), and the webhook, health check and
PowerDNS callers that read through them, against a real aiohttp server on 127.0.0.1 that
streams until the client goes away (a fault a real receiver or PowerDNS cannot be made to
produce on cue)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import pytest
from aiohttp import web
from support.web import on_loopback

from canary.clusters.health import PROBE_BODY_BYTES, http_check
from canary.core.records import EndEntry, StartEntry
from canary.httpio import AnswerTooLarge, read_bounded, read_prefix
from canary.notify.webhooks import Notifier, WebhookConfig
from canary.routers import RouterRejected, powerdns
from canary.routers.powerdns import PowerDNSRouter

CHUNK = b"x" * 65536
ENOUGH = 1 << 30  # the server gives up after this: a test that reads it all fails by time


@dataclass
class Endless:
    url: str = ""
    sent: int = 0  # bytes written, across requests

    async def handle(self, request: web.Request) -> web.StreamResponse:
        status = int(request.query.get("status", "200"))
        if "length" in request.query:  # a Content-Length that says it all up front
            size = int(request.query["length"])
            self.sent += size
            return web.Response(status=status, body=b"y" * size)
        response = web.StreamResponse(status=status)
        await response.prepare(request)
        try:
            while self.sent < ENOUGH:
                await response.write(CHUNK)
                self.sent += len(CHUNK)
        except (ConnectionResetError, ConnectionError):
            pass  # the client stopped reading and went away: what a bounded reader does
        return response


@pytest.fixture
async def endless() -> AsyncIterator[Endless]:
    server = Endless()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", server.handle)
    async with on_loopback(app) as server.url:
        yield server


async def test_readers_stop_at_their_bound(endless: Endless) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{endless.url}/") as response:
            with pytest.raises(AnswerTooLarge, match="larger than 1048576 bytes"):
                await read_bounded(response, 1 << 20)
        async with session.get(f"{endless.url}/") as response:
            head = await read_prefix(response, 1000)
            assert head == b"x" * 1000
        # refused from its Content-Length, before reading any of it
        async with session.get(f"{endless.url}/?length=5000") as response:
            with pytest.raises(AnswerTooLarge):
                await read_bounded(response, 4999)
        async with session.get(f"{endless.url}/?length=5000") as response:
            assert await read_bounded(response, 5000) == b"y" * 5000
    assert endless.sent < ENOUGH / 4


async def test_a_webhook_answering_without_end_is_a_short_error(endless: Endless) -> None:
    hook = WebhookConfig(
        url=f"{endless.url}/hook?status=400", backoff_s=0.01, report_base_url="http://127.0.0.1:9/"
    )
    async with Notifier(allow_hosts=("127.0.0.1",), webhooks=[hook]) as notifier:
        notifier.on_entry(StartEntry(at=1.0, rollout="ns/app@1", target="ns/app", steps=[10]))
        assert (
            notifier.on_entry(
                EndEntry(
                    at=2.0, rollout="ns/app@1", outcome="rolled_back", reason="r", duration_s=1.0
                )
            )
            == 1
        )
        assert await notifier.wait(timeout_s=20)
    [result] = notifier.deliveries
    assert not result.ok and result.status == 400
    assert result.error is not None and result.error.startswith("HTTP 400: xxx")
    assert len(result.error) <= len("HTTP 400: ") + 200
    assert endless.sent < ENOUGH / 4


async def test_a_health_check_is_judged_by_its_status_not_its_endless_body(
    endless: Endless,
) -> None:
    async with aiohttp.ClientSession() as session:
        started = time.monotonic()
        ok = await http_check(session, f"{endless.url}/healthz", timeout_s=10)
        assert ok.healthy is True and "HTTP 200" in ok.detail
        bad = await http_check(session, f"{endless.url}/healthz?status=503", timeout_s=10)
        assert bad.healthy is False and "HTTP 503" in bad.detail
        assert time.monotonic() - started < 5  # not read to the timeout
    assert PROBE_BODY_BYTES == 10 * 1024
    assert endless.sent < ENOUGH / 4


async def test_a_powerdns_api_answering_without_end_is_rejected_by_name(
    endless: Endless, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(powerdns, "MAX_ANSWER_BYTES", 1 << 20)
    router = PowerDNSRouter(
        api_url=endless.url,
        api_key="k",
        zone="example.test",
        record_name="app.example.test",
        primary_address="127.0.0.10",
        canary_address="127.0.0.20",
    )
    with pytest.raises(RouterRejected, match="answer larger than 1048576 bytes"):
        await asyncio.wait_for(router.get_weight(), 20)
    assert endless.sent < ENOUGH / 4
